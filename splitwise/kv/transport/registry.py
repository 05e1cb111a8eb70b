"""The KV transports a worker can run, which it offers, and which one a pair of workers uses.

The control plane of every transfer is one gRPC stream (a header, a message per layer or bounded chunk with its
checksum, a commit). Its bytes travel in those messages (grpc), or are written by the sender straight into the
receiver's staging buffer by a backend: shared memory between workers on one host (shm), the Mooncake Transfer
Engine (mooncake; RDMA on clusters that have it, TCP elsewhere), or in-process memory with injected faults, for
tests (fake). The scheduler picks the transport per worker pair from what each worker announces in the registry.
"""

from __future__ import annotations

import logging
from typing import Sequence

from splitwise.kv.transport.base import Backend, StagedWriter, StagingBuffer, TransportOffer
from splitwise.kv.transport.fake import FakeBackend
from splitwise.kv.transport.mooncake import MooncakeBackend, MooncakeUnavailable
from splitwise.kv.transport.shm import ShmBackend, host_id

log = logging.getLogger(__name__)

GRPC = "grpc"
# The staged backends, each started in a worker by its `start` (base.Backend).
BACKENDS: dict[str, type[Backend]] = {backend.name: backend for backend in (ShmBackend, FakeBackend, MooncakeBackend)}
TRANSPORTS = (*sorted(BACKENDS, key=lambda name: BACKENDS[name].rank), GRPC)  # fastest first


def parse_transports(value: str) -> tuple[str, ...]:
    """A worker's configured transports, e.g. "shm,mooncake,grpc"; gRPC is always among them."""
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in TRANSPORTS]
    if unknown:
        raise ValueError(f"unknown KV transports {unknown}; choose from {', '.join(TRANSPORTS)}")
    return names if GRPC in names else (*names, GRPC)


def choose_transport(sender_transports: Sequence[str], sender_host: str, receiver_transports: Sequence[str],
                     receiver_host: str) -> str:
    """The fastest transport both workers offer; a same-host one only between workers on one host."""
    for transport in TRANSPORTS[:-1]:
        if transport in sender_transports and transport in receiver_transports:
            if BACKENDS[transport].needs_same_host and not (sender_host and sender_host == receiver_host):
                continue
            return transport
    return GRPC


class WorkerTransports:
    """What one worker offers: its running backends (gRPC needs none) and its host identity."""

    def __init__(self, backends: dict[str, Backend] | None = None, host: str = ""):
        self.backends = dict(backends or {})
        self.host_id = host

    @property
    def transports(self) -> tuple[str, ...]:
        return (*self.backends, GRPC)

    @classmethod
    def start(cls, names: str, advertise_host: str, mooncake_protocol: str = "tcp") -> "WorkerTransports":
        """The configured transports that work here; one that cannot start is left out with a warning."""
        host = host_id()
        backends: dict[str, Backend] = {}
        for name in parse_transports(names):
            if name == GRPC:
                continue
            try:
                backends[name] = BACKENDS[name].start(host, advertise_host, mooncake_protocol)
            except (MooncakeUnavailable, OSError) as e:
                log.warning("KV transport %s left out: %s", name, e)
        return cls(backends, host)

    def staging(self, transport: str, size: int) -> StagingBuffer | None:
        """The receiver's staging buffer for a transfer by `transport`, or None (then gRPC carries the bytes)."""
        backend = self.backends.get(transport)
        if backend is None:
            return None
        try:
            return backend.staging(size)
        except (OSError, RuntimeError) as e:
            log.warning("cannot stage %d bytes for %s (%s): the transfer goes over gRPC", size, transport, e)
            return None

    def writer(self, offer: TransportOffer, size: int) -> StagedWriter | None:
        """The sender's side of the receiver's offer, or None when it cannot be used from here (then gRPC)."""
        backend = self.backends.get(offer.transport)
        if backend is None:
            return None
        try:
            return backend.writer(offer, size)
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("cannot use the receiver's %s offer (%s): sending over gRPC", offer.transport, e)
            return None

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
