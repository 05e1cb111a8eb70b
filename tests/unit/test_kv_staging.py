"""The staged transports: where each layer's bytes go, their checksum, the receiver's segment pool, and a segment
that closes under a writer."""

import subprocess
import sys
import threading

import pytest
import torch

from splitwise.kv.layout import KVLayout
from splitwise.kv.transport.base import TransferState
from splitwise.kv.transport.fake import FakeBackend
from splitwise.kv.transport.registry import GRPC, TRANSPORTS, choose_transport, parse_transports
from splitwise.kv.transport.shm import (SHM_DIR, SegmentPool, SharedSegment, ShmBackend, host_id,
                                        remove_stale_segments, segment_size)
from splitwise.kv.transport.staged import StagedLayout, byte_view, region_checksum, stage_layer

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32", model_fingerprint="m")


@pytest.fixture
def shm():
    backend = ShmBackend(host_id())
    yield backend
    backend.close()


def test_a_layers_token_range_is_two_contiguous_ranges_keys_then_values():
    staged = StagedLayout(LAYOUT, num_tokens=10)
    row = 2 * 4 * 4  # kv_heads * head_dim * float32
    assert staged.row_bytes == row and staged.total_bytes == 3 * 2 * 10 * row
    (k_off, length), (v_off, v_length) = staged.ranges(layer=1, token_start=4, token_count=3)
    assert (k_off, v_off, length, v_length) == (1 * 20 * row + 4 * row, 1 * 20 * row + 10 * row + 4 * row, 3 * row, 3 * row)


@pytest.mark.parametrize("backend_name", ["shm", "fake"])
def test_what_the_sender_stages_the_receiver_reads_back_with_the_same_checksum(backend_name):
    backend = ShmBackend(host_id()) if backend_name == "shm" else FakeBackend("")
    staged = StagedLayout(LAYOUT, num_tokens=10)
    staging = backend.staging(staged.total_bytes)
    writer = backend.writer(staging.offer(), staged.total_bytes)
    keys, values = torch.randn(2, 6, 4), torch.randn(2, 6, 4)  # [kv_heads, tokens, head_dim]
    digest = stage_layer(writer.buffer, staged, 2, 4, keys, values)
    (k_off, length), (v_off, _) = staged.ranges(2, 4, 6)
    assert region_checksum(staging.tensor, k_off, v_off, length) == digest
    assert torch.equal(byte_view(staging.tensor, k_off, length, LAYOUT), keys.transpose(0, 1))
    assert torch.equal(byte_view(staging.tensor, v_off, length, LAYOUT), values.transpose(0, 1))
    staging.tensor[k_off] ^= 1  # one flipped bit
    assert region_checksum(staging.tensor, k_off, v_off, length) != digest
    writer.close()
    staging.close()
    backend.close()


def test_closing_the_segment_while_a_thread_still_stages_layers_does_not_crash(shm):
    staged = StagedLayout(LAYOUT, num_tokens=4096)
    staging = shm.staging(staged.total_bytes)
    path = staging.segment.path
    writer = shm.writer(staging.offer(), staged.total_bytes)
    keys, values = torch.randn(2, 4096, 4), torch.randn(2, 4096, 4)
    buffer = writer.buffer  # what an encoding thread holds while the request is cancelled
    started, stop = threading.Event(), threading.Event()

    def stage_forever():
        while not stop.is_set():
            stage_layer(buffer, staged, 0, 0, keys, values)
            started.set()

    thread = threading.Thread(target=stage_forever)
    thread.start()
    started.wait(10)
    writer.close()
    staging.close()  # not clean: the sender may still write, so the segment is unlinked, never pooled
    shm.close()
    stage_layer(buffer, staged, 1, 0, keys, values)  # still mapped for whoever holds a view
    stop.set()
    thread.join(10)
    assert not path.exists() and shm.pool.free_names == []


def test_a_segment_serves_the_next_request_only_after_a_clean_commit(shm):
    size = StagedLayout(LAYOUT, num_tokens=100).total_bytes
    first = shm.staging(size)
    name = first.segment.name
    first.close(clean=True)
    assert shm.pool.free_names == [name]
    second = shm.staging(size)
    assert second.segment.name == name and shm.pool.reused == 1
    second.close(clean=False)  # a cancelled transfer: its sender may still be writing into it
    assert shm.pool.free_names == [] and not (SHM_DIR / name).exists()
    third = shm.staging(size)
    assert third.segment.name != name and shm.pool.created == 2
    third.close(clean=True)


def test_the_pool_keeps_at_most_its_byte_limit_of_free_segments():
    pool = SegmentPool(max_free_bytes=segment_size(1))
    a, b = pool.take(10), pool.take(10)
    pool.give_back(a)
    pool.give_back(b)  # over the limit: unlinked instead of kept
    assert pool.free_names == [a.name] and not b.path.exists() and a.path.exists()
    assert segment_size(1) == 1 << 20 and segment_size((1 << 20) + 1) == 2 << 20
    pool.close()
    assert not a.path.exists()


def test_the_sender_refuses_an_offer_it_cannot_use(shm):
    staging = shm.staging(4096)
    offer = staging.offer()
    with pytest.raises(ValueError, match="another host"):
        ShmBackend("another-host").writer(offer, 4096)
    with pytest.raises(ValueError, match="holds"):
        shm.writer(offer, offer.buffer_bytes + 1)
    staging.close()


def test_transfer_states_are_ordered_and_a_failure_is_below_every_live_state():
    assert TransferState.FAILED < TransferState.WAITING < TransferState.TRANSFERRING < TransferState.DONE
    assert min(TransferState.DONE, TransferState.TRANSFERRING) is TransferState.TRANSFERRING
    assert min(TransferState.WAITING, TransferState.FAILED) is TransferState.FAILED


def test_transport_choice_prefers_shared_memory_on_one_host_then_mooncake_then_grpc():
    assert TRANSPORTS == ("shm", "fake", "mooncake", GRPC)
    everything = parse_transports("shm,mooncake")
    assert everything == ("shm", "mooncake", GRPC)
    assert choose_transport(everything, "host-a", everything, "host-a") == "shm"
    assert choose_transport(everything, "host-a", everything, "host-b") == "mooncake"
    assert choose_transport(everything, "", everything, "") == "mooncake"  # unknown hosts never share memory
    assert choose_transport((GRPC,), "host-a", everything, "host-a") == GRPC
    assert choose_transport(("fake", GRPC), "p", ("fake", GRPC), "p") == "fake"
    assert choose_transport(("fake", GRPC), "p", ("fake", GRPC), "q") == GRPC
    with pytest.raises(ValueError, match="unknown KV transports"):
        parse_transports("shm,rdma")


def test_segments_of_dead_processes_are_removed_and_live_ones_kept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = SHM_DIR / f"splitwise-kv-{dead.pid}-deadbeef0000"
    live = SharedSegment.create(4096)
    stale.write_bytes(b"\0" * 4096)
    try:
        assert remove_stale_segments() >= 1
        assert not stale.exists() and live.path.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.close()


def test_a_new_segment_is_offered_before_its_pages_exist_and_the_sender_writes_only_once_they_all_do():
    size = 4 << 20
    segment = SharedSegment.create(size)  # as the pool creates it, before its thread allocates the pages
    peer = SharedSegment.open(segment.name, size)
    try:
        assert segment.path.stat().st_blocks == 0  # offered at once: nothing allocated on the request's path
        whole = threading.Event()
        waiter = threading.Thread(target=lambda: (peer.wait_whole(10), whole.set()))
        waiter.start()
        assert not whole.wait(0.2)  # the sender's first write waits: a write into an unallocated page may SIGBUS
        segment.allocate()
        waiter.join(10)
        assert whole.is_set() and segment.path.stat().st_blocks * 512 >= size
        peer.wait_whole(0)  # known whole from now on: no wait, no stat
    finally:
        peer.close()
        segment.close()


def test_a_segment_that_cannot_be_allocated_fails_its_transfer_and_is_never_pooled(monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("splitwise.kv.transport.shm.os.posix_fallocate", full)
    backend = ShmBackend(host_id())
    staged = StagedLayout(LAYOUT, num_tokens=10)
    try:
        staging = backend.staging(staged.total_bytes)
        staging.segment.allocated.wait(10)
        writer = backend.writer(staging.offer(), staged.total_bytes)
        with pytest.raises(OSError, match="could not allocate"):
            writer.buffer  # the sender writes nothing into it
        with pytest.raises(OSError, match="No space left"):
            staging.tensor  # nor does the receiver read it
        path = staging.segment.path
        staging.close(clean=True)
        assert backend.pool.free_names == [] and not path.exists()
    finally:
        backend.close()


@pytest.mark.parametrize("layerwise", [True, False])
def test_a_transfer_into_a_segment_that_cannot_be_allocated_fails_as_the_receivers_fault(monkeypatch, layerwise):
    import asyncio

    import grpc

    from splitwise.engine.sampling import SampledToken
    from splitwise.kv.transport.base import Fault, KVTransferError
    from splitwise.kv.transport.receiver import KVReceiver
    from splitwise.kv.transport.sender import KVSender

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("splitwise.kv.transport.shm.os.posix_fallocate", full)
    tokens = list(range(10))
    size = StagedLayout(LAYOUT, len(tokens)).total_bytes
    written = []

    async def run():
        backend = ShmBackend(host_id())
        receiver = KVReceiver(lambda *kv: written.append(kv), LAYOUT, tokens, staging=backend.staging(size))
        offer = receiver.offer()
        sender = KVSender(receiver.consume, "t", "r1", LAYOUT, tokens, 1 << 20, 5.0, backend.writer(offer, size),
                          layerwise=layerwise, layer_runs=True)
        task = asyncio.create_task(sender.send())

        def compute():  # the compute thread: nothing it calls raises
            for layer in range(LAYOUT.num_layers):
                kv = torch.randn(LAYOUT.num_kv_heads, len(tokens), LAYOUT.head_dim)
                sender.on_layer_kv(layer, kv, kv, 0)

        await asyncio.to_thread(compute)
        await asyncio.sleep(0)
        sender.commit(SampledToken(7, -0.5, None))
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        receiver.close()
        backend.close()
        return outcome, receiver

    outcome, receiver = asyncio.run(run())
    assert isinstance(outcome, KVTransferError), outcome
    assert outcome.fault is Fault.RECEIVER and outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "could not allocate" in str(outcome)
    assert written == [] and receiver.committed.done() and receiver.committed.exception() is not None
