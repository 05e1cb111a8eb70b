"""Serialized transfers announce runs of layers: one message and one checksum for many layers (staged, or their
bytes in the message over gRPC), to a receiver that offers runs; the same KV lands as layer by layer, and a
receiver checks a run as strictly."""

import asyncio

import pytest
import torch

from splitwise.engine.sampling import SampledToken
from splitwise.kv.chunks import KVChunk, KVIntegrityError
from splitwise.kv.layout import KVLayout
from splitwise.kv.transport import sender as sender_module
from splitwise.kv.transport.base import Fault
from splitwise.kv.transport.fake import FakeBackend, Faults
from splitwise.kv.transport.receiver import KVReceiver
from splitwise.kv.transport.sender import KVSender
from splitwise.kv.transport.staged import StagedLayout, run_ranges
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2

LAYOUT = KVLayout(num_layers=6, num_kv_heads=2, head_dim=8, dtype="float32", model_fingerprint="m")
TOKENS = list(range(100, 113))


def prefill_kv(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values as the compute thread exports them: [kv_heads, tokens, head_dim] views."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(TOKENS), LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return [(torch.randn(shape, generator=g).transpose(0, 1), torch.randn(shape, generator=g).transpose(0, 1))
            for _ in range(LAYOUT.num_layers)]


async def transfer(layer_runs: bool, corrupt=None, token_ranges=((0, len(TOKENS)),), faults=None, before_commit=None):
    """One serialized transfer through the fake staged backend; returns (sent messages, the receiver's cache, the
    receiver, its outcome). `before_commit(receiver, sent)` runs once the prefill's layers are exported."""
    backend = FakeBackend("")
    if faults is not None:
        backend.faults = faults
    size = StagedLayout(LAYOUT, len(TOKENS)).total_bytes
    cache = torch.zeros(LAYOUT.num_layers, 2, len(TOKENS), LAYOUT.num_kv_heads, LAYOUT.head_dim)
    sinks = []

    def sink(layer, start, keys, values):  # one layer [tokens, heads, dim], or a run [layers, tokens, heads, dim]
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        sinks.append((layer, keys.shape[0]))
        layers, tokens = slice(layer, layer + keys.shape[0]), slice(start, start + keys.shape[1])
        cache[layers, 0, tokens] = keys
        cache[layers, 1, tokens] = values

    receiver = KVReceiver(sink, LAYOUT, TOKENS, staging=backend.staging(size))
    offer = receiver.offer()
    if not layer_runs:  # a receiver that predates runs offers none
        offer = type(offer)(**{**offer.__dict__, "layer_runs": False})
    sent = []

    async def open_stream(messages):
        async def recorded():
            async for msg in messages:
                if corrupt is not None and msg.WhichOneof("kind") == "chunk":
                    corrupt(receiver.staging.tensor)
                sent.append(msg)
                yield msg
        return await receiver.consume(recorded())

    sender = KVSender(open_stream, "t", "r1", LAYOUT, TOKENS, 1 << 20, 5.0, backend.writer(offer, size),
                      layerwise=False, layer_runs=offer.layer_runs)
    task = asyncio.create_task(sender.send())
    kv = prefill_kv()

    def compute():  # the compute thread; a chunked prefill exports each layer once per chunk
        for start, end in token_ranges:
            for layer, (keys, values) in enumerate(kv):
                sender.on_layer_kv(layer, keys[:, start:end], values[:, start:end], start)

    await asyncio.to_thread(compute)
    await asyncio.sleep(0)  # the layers it handed to the loop are queued before the commit, as after a prefill
    if before_commit is not None:
        before_commit(receiver, sent)
    sender.commit(SampledToken(7, -0.5, None))
    outcome = await asyncio.gather(task, return_exceptions=True)
    receiver.close()
    backend.close()
    transfer.sinks = sinks  # (first layer, layers) of each write into the cache, of the last transfer
    return [m for m in sent if m.WhichOneof("kind") == "chunk"], cache, receiver, outcome[0], kv


def expected_cache(kv) -> torch.Tensor:
    return torch.stack([torch.stack([k.transpose(0, 1), v.transpose(0, 1)]) for k, v in kv])


async def test_a_receiver_that_offers_runs_gets_the_whole_prompt_in_one_message_and_the_same_kv():
    chunks, cache, receiver, stats, kv = await transfer(layer_runs=True)
    assert len(chunks) == 1 and chunks[0].chunk.num_layers == LAYOUT.num_layers and chunks[0].chunk.staged
    assert torch.equal(cache, expected_cache(kv))
    assert receiver.layers_received == frozenset(range(LAYOUT.num_layers))
    assert (stats.num_layers, stats.num_chunks) == (LAYOUT.num_layers, 1)
    assert transfer.sinks == [(0, LAYOUT.num_layers)]  # the run is written into the cache in one call
    assert receiver.stats.num_bytes == StagedLayout(LAYOUT, len(TOKENS)).total_bytes


async def test_a_receiver_without_runs_gets_one_message_per_layer_and_the_same_kv():
    chunks, cache, _, stats, kv = await transfer(layer_runs=False)
    assert [c.chunk.layer for c in chunks] == list(range(LAYOUT.num_layers))
    assert all(c.chunk.num_layers == 0 for c in chunks)  # the field stays unset: an older receiver reads one layer
    assert torch.equal(cache, expected_cache(kv))
    assert stats.num_layers == LAYOUT.num_layers


async def test_a_chunked_prefill_sends_one_run_per_token_range():
    chunks, cache, _, _, kv = await transfer(layer_runs=True, token_ranges=((0, 8), (8, len(TOKENS))))
    assert [(c.chunk.token_start, c.chunk.token_count, c.chunk.num_layers) for c in chunks] == [
        (0, 8, LAYOUT.num_layers), (8, len(TOKENS) - 8, LAYOUT.num_layers)]
    assert torch.equal(cache, expected_cache(kv))  # a partial token range's strided views read the right bytes


async def test_runs_are_bounded_so_a_large_transfer_pipelines(monkeypatch):
    layer_bytes = len(TOKENS) * LAYOUT.bytes_per_token_per_layer
    monkeypatch.setattr(sender_module, "MAX_RUN_BYTES", 2 * layer_bytes)
    chunks, cache, _, _, kv = await transfer(layer_runs=True)
    assert [(c.chunk.layer, c.chunk.num_layers) for c in chunks] == [(0, 2), (2, 2), (4, 2)]
    assert torch.equal(cache, expected_cache(kv))


async def test_staged_layers_are_in_the_receivers_buffer_when_the_prefill_ends_and_announced_only_at_the_commit():
    """Serialized with a staged writer, each layer is copied into the receiver's buffer on the compute thread as it
    is ready: after the prefill only the announcement is left, no copy."""
    seen = {}

    def before_commit(receiver, sent):
        seen["chunks"] = [m for m in sent if m.WhichOneof("kind") == "chunk"]
        seen["staged"] = receiver.staging.tensor.clone()

    chunks, _, _, stats, kv = await transfer(layer_runs=True, before_commit=before_commit)
    assert seen["chunks"] == [] and len(chunks) == 1
    staged = StagedLayout(LAYOUT, len(TOKENS))
    for layer, (keys, values) in enumerate(kv):
        (k_off, length), (v_off, _) = staged.ranges(layer, 0, len(TOKENS))
        assert seen["staged"][k_off:k_off + length].view(torch.float32).equal(keys.transpose(0, 1).flatten())
        assert seen["staged"][v_off:v_off + length].view(torch.float32).equal(values.transpose(0, 1).flatten())
    assert stats.staging_seconds > 0 and stats.cpu_seconds >= 0


async def test_a_staged_runs_failed_flush_fails_the_transfer_as_the_senders_and_announces_nothing_after_it(
        monkeypatch):
    layer_bytes = len(TOKENS) * LAYOUT.bytes_per_token_per_layer
    monkeypatch.setattr(sender_module, "MAX_RUN_BYTES", 2 * layer_bytes)
    chunks, _, receiver, outcome, _ = await transfer(layer_runs=True, faults=Faults(fail_at_layer=1))
    assert [(c.chunk.layer, c.chunk.num_layers) for c in chunks] == [(0, 2)]  # the second run's write failed
    assert outcome.fault is Fault.SENDER and "write of layer 2" in str(outcome)
    assert receiver.committed.done() and "the sender gave up" in str(receiver.committed.exception())


async def test_a_byte_changed_anywhere_in_a_run_fails_its_checksum():
    def flip_last_byte(buffer):
        buffer[StagedLayout(LAYOUT, len(TOKENS)).total_bytes - 1] ^= 0xFF

    _, _, receiver, outcome, _ = await transfer(layer_runs=True, corrupt=flip_last_byte)
    assert isinstance(outcome, KVIntegrityError)
    assert f"checksum mismatch in layers [0, {LAYOUT.num_layers})" in str(outcome)
    assert receiver.committed.done() and receiver.committed.exception() is outcome


def staged_receiver() -> tuple[KVReceiver, FakeBackend]:
    backend = FakeBackend("")
    receiver = KVReceiver(lambda *a: None, LAYOUT, TOKENS,
                          staging=backend.staging(StagedLayout(LAYOUT, len(TOKENS)).total_bytes))
    receiver.transport = "fake"
    return receiver, backend


@pytest.mark.parametrize("layer, num_layers", [(4, 3), (0, 7), (0, -1)])
async def test_a_run_past_the_models_layers_is_refused_before_anything_is_written(layer, num_layers):
    receiver, backend = staged_receiver()
    digest = 0
    if num_layers > 0 and layer + num_layers <= LAYOUT.num_layers:
        pytest.fail("not a run past the model's layers")
    with pytest.raises(KVIntegrityError, match="layers|chunk"):
        receiver._chunk_kv(KVChunk(layer, 0, len(TOKENS), b"", b"", digest, staged=True, num_layers=num_layers))
    backend.close()


async def test_a_chunk_carrying_its_bytes_must_carry_every_layer_it_announces():
    receiver, backend = staged_receiver()
    one_layer = LAYOUT.bytes_per_token_per_layer // 2
    chunk = KVChunk(0, 0, 1, b"k" * one_layer, b"v" * one_layer, 0, staged=False, num_layers=2)
    with pytest.raises(KVIntegrityError, match=rf"layers \[0, 2\) carries {one_layer}\+{one_layer} bytes"):
        receiver._chunk_kv(chunk)
    backend.close()


async def grpc_transfer(max_chunk_bytes: int = 1 << 20, layer_runs: bool = True, corrupt=None):
    """One serialized transfer over the gRPC stream alone (no staging): (chunk messages, cache, outcome, kv)."""
    cache = torch.zeros(LAYOUT.num_layers, 2, len(TOKENS), LAYOUT.num_kv_heads, LAYOUT.head_dim)

    def sink(layer, start, keys, values):
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        layers, tokens = slice(layer, layer + keys.shape[0]), slice(start, start + keys.shape[1])
        cache[layers, 0, tokens] = keys
        cache[layers, 1, tokens] = values

    receiver = KVReceiver(sink, LAYOUT, TOKENS)
    assert receiver.offer().transport == "grpc" and receiver.offer().layer_runs
    sent = []

    async def open_stream(messages):
        async def recorded():
            async for msg in messages:
                if corrupt is not None and msg.WhichOneof("kind") == "chunk":  # as it would arrive over the wire
                    msg = common_pb2.KVTransferMessage.FromString(msg.SerializeToString())
                    corrupt(msg.chunk)
                sent.append(msg)
                yield msg
        return await receiver.consume(recorded())

    sender = KVSender(open_stream, "t", "r1", LAYOUT, TOKENS, max_chunk_bytes, 5.0, layerwise=False,
                      layer_runs=layer_runs)
    task = asyncio.create_task(sender.send())
    kv = prefill_kv()
    for layer, (keys, values) in enumerate(kv):
        sender.on_layer_kv(layer, keys, values, 0)
    await asyncio.sleep(0)
    sender.commit(SampledToken(7, -0.5, None))
    outcome = (await asyncio.gather(task, return_exceptions=True))[0]
    return [m for m in sent if m.WhichOneof("kind") == "chunk"], cache, outcome, kv


async def test_over_grpc_a_receiver_that_takes_runs_gets_the_layers_in_one_message_of_their_bytes():
    chunks, cache, stats, kv = await grpc_transfer()
    assert [(c.chunk.layer, c.chunk.num_layers, c.chunk.staged) for c in chunks] == [(0, LAYOUT.num_layers, False)]
    assert torch.equal(cache, expected_cache(kv))
    assert (stats.num_layers, stats.num_chunks) == (LAYOUT.num_layers, 1)


async def test_over_grpc_a_run_is_bounded_by_the_chunk_size_and_a_bigger_layer_goes_alone_in_token_chunks():
    layer_bytes = len(TOKENS) * LAYOUT.bytes_per_token_per_layer
    chunks, cache, _, kv = await grpc_transfer(max_chunk_bytes=4 * layer_bytes)
    assert [(c.chunk.layer, c.chunk.num_layers) for c in chunks] == [(0, 4), (4, 2)]
    assert all(c.ByteSize() <= 4 * layer_bytes + 64 for c in chunks)
    assert torch.equal(cache, expected_cache(kv))
    chunks, cache, _, kv = await grpc_transfer(max_chunk_bytes=layer_bytes // 2)
    assert all(c.chunk.num_layers == 0 for c in chunks) and len(chunks) == 3 * LAYOUT.num_layers  # 6 + 6 + 1 tokens
    assert torch.equal(cache, expected_cache(kv))


async def test_over_grpc_a_receiver_without_runs_gets_a_message_per_layer():
    chunks, cache, _, kv = await grpc_transfer(layer_runs=False)
    assert [(c.chunk.layer, c.chunk.num_layers) for c in chunks] == [(layer, 0) for layer in range(LAYOUT.num_layers)]
    assert torch.equal(cache, expected_cache(kv))


async def test_over_grpc_a_byte_changed_in_a_run_fails_its_checksum():
    def flip_a_value_byte(chunk):
        chunk.value = chunk.value[:-1] + bytes([chunk.value[-1] ^ 0xFF])

    _, _, outcome, _ = await grpc_transfer(corrupt=flip_a_value_byte)
    assert isinstance(outcome, KVIntegrityError)
    assert f"checksum mismatch in layers [0, {LAYOUT.num_layers})" in str(outcome)


def test_a_runs_ranges_merge_into_one_for_the_whole_prompt_and_the_count_survives_the_wire():
    staged = StagedLayout(LAYOUT, len(TOKENS))
    assert run_ranges(staged, 0, LAYOUT.num_layers, 0, len(TOKENS)) == [(0, staged.total_bytes)]
    assert len(run_ranges(staged, 0, 2, 0, 5)) == 4  # a partial token range: keys and values apart, per layer
    chunk = KVChunk(1, 0, 5, b"", b"", 9, staged=True, num_layers=3)
    assert convert.chunk_from_pb(convert.chunk_to_pb(chunk).chunk) == chunk
    single = KVChunk(1, 0, 5, b"", b"", 9, staged=True)
    assert convert.chunk_from_pb(convert.chunk_to_pb(single).chunk).num_layers == 1
