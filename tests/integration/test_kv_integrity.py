"""Whatever the transport, a corrupt chunk fails the transfer with DATA_LOSS and frees the KV on both sides."""

import dataclasses

import grpc
import pytest

from splitwise.client import SplitwiseClient
from splitwise.kv.transport.base import KVTransferError
from splitwise.kv.transport.sender import KVSender
from tests.integration.cluster import assert_no_kv_held, local_cluster
from tests.prerequisites import needs_mooncake
from tests.traces import wait_for_whole_trace

TRANSPORTS = ["grpc", "shm", "fake", pytest.param("mooncake", marks=needs_mooncake())]


@pytest.fixture(scope="module", params=TRANSPORTS)
async def cluster(request, redis_url, cache_dir, trace_file):
    only = {"kv_transports": request.param}
    async with local_cluster(redis_url, "tiny-llama", cache_dir, prompt_overrides=only,
                             scheduler_overrides={"kv_layerwise_min_tokens": 0}, **only) as c:
        yield request.param, c


def flip_first_byte_of_layer_0(encode):
    """Wraps KVSender._encode: layer 0's bytes change after their checksum was taken, as on a bad link."""

    def corrupting(self, layer, keys, values, token_start):
        encoded = encode(self, layer, keys, values, token_start)
        if layer != 0:
            return encoded
        chunk = encoded.chunks[0]
        if chunk.staged:
            offset = encoded.ranges[0][0]
            self.writer.buffer[offset] ^= 0xFF
        else:
            key = bytes([chunk.key[0] ^ 0xFF]) + chunk.key[1:]
            encoded.chunks[0] = dataclasses.replace(chunk, key=key)
        return encoded

    return corrupting


async def request_fails_with_data_loss_in_layer_0(c) -> None:
    async with SplitwiseClient(c.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.generate(token_ids=list(range(10, 60)), max_tokens=8, timeout=30)
    assert error.value.code() == grpc.StatusCode.DATA_LOSS, error.value.details()
    assert "checksum mismatch in layer 0" in error.value.details()


async def test_a_corrupt_chunk_fails_the_transfer_with_data_loss_and_frees_kv_everywhere(cluster, monkeypatch):
    transport, c = cluster
    monkeypatch.setattr(KVSender, "_encode", flip_first_byte_of_layer_0(KVSender._encode))
    await request_fails_with_data_loss_in_layer_0(c)
    await assert_no_kv_held(c)


def hiding_the_receivers_status(send):
    """Wraps KVSender.send: its failure reads as grpcio's "Internal error from Core" when a write races the
    receiver's abort (grpc/grpc#36066), which says nothing of why the receiver refused the KV."""

    async def sending(self):
        try:
            return await send(self)
        except KVTransferError as e:
            raise KVTransferError("KV transfer failed: UNAVAILABLE: Internal error from Core") from e

    return sending


async def test_the_receivers_data_loss_reaches_the_client_when_the_sender_only_saw_its_peer_go_away(
        cluster, monkeypatch, caplog):
    transport, c = cluster
    monkeypatch.setattr(KVSender, "_encode", flip_first_byte_of_layer_0(KVSender._encode))
    monkeypatch.setattr(KVSender, "send", hiding_the_receivers_status(KVSender.send))
    await request_fails_with_data_loss_in_layer_0(c)
    assert "routing again" not in caplog.text  # the prompt worker is not blamed for the receiver's refusal
    await assert_no_kv_held(c)


async def test_after_a_corrupt_transfer_the_next_one_by_the_same_transport_succeeds(cluster, trace_file):
    transport, c = cluster
    async with SplitwiseClient(c.address) as client:
        out = await client.generate(token_ids=list(range(10, 60)), max_tokens=8, ignore_eos=True, timeout=30)
    assert out.completion_tokens == 8
    spans = await wait_for_whole_trace([trace_file], out.request_id)
    moved = {s["attributes"]["kv.transport"] for s in spans if s["name"] in ("kv_transfer.send", "kv_transfer.receive")}
    assert moved == {transport}
    await assert_no_kv_held(c)
