"""The fake transport, for tests: staging buffers in this process's memory, and faults injected on demand.

Both workers must run in one process (the in-process test cluster). A test reaches the backend through a
worker's transports (`transports.backends["fake"]`) and sets its `faults` to make a transfer fail at a chosen
layer, stall there, or arrive corrupt, without a network namespace or root.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass

import torch

from splitwise.kv.transport.base import TransportOffer

_buffers: dict[str, torch.Tensor] = {}  # every fake staging buffer of this process, by name
_names = itertools.count()


@dataclass
class Faults:
    """What the fake sender does to its transfers; layers count from 0, in the order they are written."""

    fail_at_layer: int | None = None     # the write of this layer fails as a broken link would (ConnectionError)
    stall_at_layer: int | None = None    # the write of this layer blocks for stall_s (or until the transfer ends)
    stall_s: float = 3600.0
    corrupt_layer: int | None = None     # one byte of this layer changes after its checksum was taken
    refuse_staging: bool = False         # the receiver cannot stage: the transfer goes over the gRPC stream


def process_id() -> str:
    return f"process-{os.getpid()}"


class FakeStaging:
    transport = "fake"

    def __init__(self, size: int):
        self.name = f"fake-kv-{next(_names)}"
        self.tensor = torch.zeros(size, dtype=torch.uint8)
        _buffers[self.name] = self.tensor

    def offer(self) -> TransportOffer:
        return TransportOffer("fake", host_id=process_id(), shm_name=self.name, buffer_bytes=self.tensor.numel())

    def close(self, clean: bool = False) -> None:
        _buffers.pop(self.name, None)
        self.tensor = None


class FakeWriter:
    transport = "fake"
    remote = True  # flush runs off the event loop, so a stall there stalls this transfer only

    def __init__(self, buffer: torch.Tensor, faults: Faults):
        self.buffer = buffer
        self.faults = faults
        self._layers = 0
        self._closed = threading.Event()

    def flush(self, ranges: list[tuple[int, int]]) -> None:
        layer, self._layers = self._layers, self._layers + 1
        faults = self.faults
        if layer == faults.stall_at_layer:
            self._closed.wait(faults.stall_s)
        if layer == faults.fail_at_layer:
            raise ConnectionError(f"fake transport: the write of layer {layer} failed (injected)")
        if layer == faults.corrupt_layer and self.buffer is not None:
            self.buffer[ranges[0][0]] ^= 0xFF

    def close(self) -> None:
        self.buffer = None
        self._closed.set()


class FakeBackend:
    name = "fake"
    rank = 1
    needs_same_host = True

    def __init__(self, host: str):
        self.faults = Faults()

    @classmethod
    def start(cls, host: str, advertise_host: str, mooncake_protocol: str) -> "FakeBackend":
        return cls(host)

    def staging(self, size: int) -> FakeStaging:
        if self.faults.refuse_staging:
            raise OSError("fake transport: staging refused (injected)")
        return FakeStaging(size)

    def writer(self, offer: TransportOffer, size: int) -> FakeWriter:
        buffer = _buffers.get(offer.shm_name)
        if offer.host_id != process_id() or buffer is None:
            raise ValueError("the fake transport works only within one process")
        if buffer.numel() < size:
            raise ValueError(f"the receiver's buffer holds {buffer.numel()} bytes, the KV {size}")
        return FakeWriter(buffer, self.faults)

    def close(self) -> None:
        pass
