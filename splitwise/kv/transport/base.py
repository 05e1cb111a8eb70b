"""What every KV transport shares: the ordered states of a transfer, the receiver's offer, and the two small
interfaces a backend implements (the receiver's staging buffer, the sender's writer into it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from splitwise.telemetry import metrics


class TransferState(enum.IntEnum):
    """Ordered as SGLang's KVPoll: the least advanced of several transfers is their `min`, and a failure is below
    every live state. A transfer only moves up, except into FAILED."""

    FAILED = 0
    WAITING = 1       # offered (blocks reserved, staging ready); the sender's prefill has not produced a layer yet
    TRANSFERRING = 2  # layers are moving
    DONE = 3          # committed: every layer arrived and was verified


class Fault(enum.Enum):
    """Which end of a transfer caused its failure, as far as the end that saw it knows. The scheduler avoids the
    worker at fault; a worker that only saw its peer fail stays usable."""

    UNKNOWN = "unknown"
    SENDER = "sender"      # its own write failed, it gave up, or it went away mid-transfer
    RECEIVER = "receiver"  # it refused the KV, or went away
    KV_STORE = "kv_store"  # the kv_store a worker was to read the KV from (a kept copy, or the relay)


class KVTransferError(Exception):
    """A KV transfer that could not complete; the message says why, `code` how the receiver refused it, `fault`
    which end caused it."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 fault: Fault = Fault.UNKNOWN):
        super().__init__(message)
        self.code = code
        self.fault = fault


@dataclass(frozen=True)
class TransportOffer:
    """Where a receiver takes one request's KV besides the control stream (its staging buffer), as the sender
    needs to reach it. `transport` "grpc": nowhere, the bytes travel in the stream's messages."""

    transport: str = "grpc"
    host_id: str = ""           # shm, fake: who can map the buffer (same host, or same process)
    shm_name: str = ""          # shm, fake: the buffer's name
    mooncake_session: str = ""  # mooncake: the receiver's transfer engine
    buffer_address: int = 0     # mooncake: the registered buffer's address there
    buffer_bytes: int = 0
    layer_runs: bool = False    # the receiver takes one chunk for several layers (one message, one checksum)


@dataclass
class TransferStats:
    num_bytes: int = 0
    num_chunks: int = 0  # messages carrying KV (a layer, or a bounded chunk of one)
    num_layers: int = 0
    seconds: float = 0.0  # from the first layer's bytes moving (serialized: from the prefill's end) to the commit
    cpu_seconds: float = 0.0  # this side's own work on the bytes: copies, checksums, the write into blocks
    staging_seconds: float = 0.0  # serialized, staged: copying layers into the receiver's buffer during the prefill

    def attributes(self) -> dict:
        return {"kv.bytes": self.num_bytes, "kv.layers": self.num_layers, "kv.chunks": self.num_chunks,
                "kv.bytes_per_message": self.num_bytes // max(self.num_chunks, 1),
                "kv.seconds": self.seconds, "kv.cpu_seconds": self.cpu_seconds,
                "kv.staging_seconds": self.staging_seconds,
                "kv.bandwidth_mbps": self.num_bytes * 8 / 1e6 / max(self.seconds, 1e-9)}


def record_transfer(direction: str, transport: str, stats: TransferStats, outcome: str) -> None:
    """Counters and histograms of a transfer that ended; `outcome` ok, failed, expired (lease) or cancelled."""
    attributes = {"direction": direction, "transport": transport}
    metrics.kv_transferred.add(stats.num_bytes, attributes)
    metrics.kv_transfers.add(1, {**attributes, "outcome": outcome})
    if outcome == "failed":
        metrics.kv_transport_failures.add(1, attributes)
    elif outcome == "expired":
        metrics.kv_leases_expired.add(1, attributes)
    if outcome == "ok":
        metrics.kv_transfer_duration.record(stats.seconds, attributes)
        metrics.kv_messages_per_transfer.record(stats.num_chunks, attributes)
        metrics.kv_bytes_per_message.record(stats.num_bytes / max(stats.num_chunks, 1), attributes)
        metrics.kv_cpu_seconds.record(stats.cpu_seconds, attributes)


class StagingBuffer(Protocol):
    """Receiver side of a staged transport: one request's buffer, readable as the uint8 `tensor`."""

    transport: str
    tensor: torch.Tensor

    def offer(self) -> TransportOffer: ...

    def close(self, clean: bool = False) -> None:
        """Lets the buffer go. `clean`: the sender committed, so it has provably stopped writing (it writes a layer
        before announcing it, and nothing after its commit), and the buffer may serve another request."""


class StagedWriter(Protocol):
    """Sender side of a staged transport: layers are staged into `buffer`; `flush` makes byte ranges land at the
    receiver when `remote` (a network write), and is a no-op for memory the receiver maps itself."""

    transport: str
    buffer: torch.Tensor | None
    remote: bool

    def flush(self, ranges: list[tuple[int, int]]) -> None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """A staged transport, as one worker runs it. `rank`: lower is faster; the scheduler picks the fastest both
    workers offer (`registry.choose_transport`). The gRPC stream needs no backend: it is always there."""

    name: str
    rank: int
    needs_same_host: bool  # only between workers that share memory

    @classmethod
    def start(cls, host: str, advertise_host: str, mooncake_protocol: str) -> "Backend":
        """The backend in a worker: from its host identity, the address it advertises, its Mooncake protocol."""

    def staging(self, size: int) -> StagingBuffer:
        """A receiver's buffer of `size` bytes for one request (OSError or RuntimeError when it cannot have one)."""

    def writer(self, offer: TransportOffer, size: int) -> StagedWriter:
        """The sender's side of a receiver's offer (OSError, ValueError or RuntimeError when it cannot be used)."""

    def close(self) -> None: ...
