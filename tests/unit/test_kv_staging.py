"""The staging buffer: where each layer's bytes go, their checksum, and a segment that closes under a writer."""

import subprocess
import sys
import threading

import torch

from splitwise.kv.layout import KVLayout
from splitwise.kv.staging import (SHM_DIR, SharedSegment, ShmStaging, ShmWriter, StagedLayout, byte_view,
                                  region_checksum, remove_stale_segments, stage_layer)
from splitwise.kv.transport import GRPC, MOONCAKE, SHM, choose_transport, parse_transports

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32", model_fingerprint="m")


def test_a_layers_token_range_is_two_contiguous_ranges_keys_then_values():
    staged = StagedLayout(LAYOUT, num_tokens=10)
    row = 2 * 4 * 4  # kv_heads * head_dim * float32
    assert staged.row_bytes == row and staged.total_bytes == 3 * 2 * 10 * row
    (k_off, length), (v_off, v_length) = staged.ranges(layer=1, token_start=4, token_count=3)
    assert (k_off, v_off, length, v_length) == (1 * 20 * row + 4 * row, 1 * 20 * row + 10 * row + 4 * row, 3 * row, 3 * row)


def test_what_the_sender_stages_the_receiver_reads_back_with_the_same_checksum():
    staged = StagedLayout(LAYOUT, num_tokens=10)
    staging = ShmStaging(staged.total_bytes)
    writer = ShmWriter(staging.name, staged.total_bytes)
    keys, values = torch.randn(2, 6, 4), torch.randn(2, 6, 4)  # [kv_heads, tokens, head_dim]
    crc = stage_layer(writer.buffer, staged, 2, 4, keys, values)
    (k_off, length), (v_off, _) = staged.ranges(2, 4, 6)
    assert region_checksum(staging.tensor, k_off, v_off, length) == crc
    assert torch.equal(byte_view(staging.tensor, k_off, length, LAYOUT), keys.transpose(0, 1))
    assert torch.equal(byte_view(staging.tensor, v_off, length, LAYOUT), values.transpose(0, 1))
    staging.tensor[k_off] ^= 1  # one flipped bit
    assert region_checksum(staging.tensor, k_off, v_off, length) != crc
    writer.close()
    staging.close()


def test_closing_the_segments_while_a_thread_still_stages_layers_does_not_crash():
    staged = StagedLayout(LAYOUT, num_tokens=4096)
    staging = ShmStaging(staged.total_bytes)
    writer = ShmWriter(staging.name, staged.total_bytes)
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
    staging.close()
    stage_layer(buffer, staged, 1, 0, keys, values)  # still mapped for whoever holds a view
    stop.set()
    thread.join(10)
    assert not staging.segment.path.exists()


def test_transport_choice_prefers_shared_memory_on_one_host_then_mooncake_then_grpc():
    everything = parse_transports("shm,mooncake")
    assert everything == (SHM, MOONCAKE, GRPC)
    assert choose_transport(everything, "host-a", everything, "host-a") == SHM
    assert choose_transport(everything, "host-a", everything, "host-b") == MOONCAKE
    assert choose_transport(everything, "", everything, "") == MOONCAKE  # unknown hosts never share memory
    assert choose_transport((GRPC,), "host-a", everything, "host-a") == GRPC


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
