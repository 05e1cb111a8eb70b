"""KV transports and the states of a transfer.

The control plane of every transfer is the PushKV gRPC stream: a header (request, KV layout, transport),
one message per layer range with its checksum, a commit. The bytes travel in those messages (grpc), or
are written by the sender straight into the receiver's staging buffer for that request: through shared
memory when both workers are on one host (shm), or by the Mooncake Transfer Engine (mooncake; RDMA on
clusters that have it, TCP elsewhere). The scheduler picks the transport per worker pair from what each
worker announces in the registry; the receiver checks the sender's model, dtype and layout at the header.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Sequence

log = logging.getLogger(__name__)

GRPC, SHM, MOONCAKE = "grpc", "shm", "mooncake"
TRANSPORTS = (SHM, MOONCAKE, GRPC)  # fastest first


class TransferState(enum.Enum):
    WAITING = "waiting"            # reserved; the sender's prefill has not produced a layer yet
    TRANSFERRING = "transferring"  # layers are arriving
    DONE = "done"                  # committed: every layer arrived and verified
    FAILED = "failed"


@dataclass(frozen=True)
class TransportOffer:
    """Where a receiver takes one request's KV besides the gRPC stream."""

    transport: str = GRPC
    host_id: str = ""
    shm_name: str = ""
    mooncake_session: str = ""
    buffer_address: int = 0
    buffer_bytes: int = 0


def parse_transports(value: str) -> tuple[str, ...]:
    """A worker's configured transports, e.g. "shm,mooncake,grpc"; gRPC is always among them."""
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in TRANSPORTS]
    if unknown:
        raise ValueError(f"unknown KV transports {unknown}; choose from {', '.join(TRANSPORTS)}")
    return names if GRPC in names else (*names, GRPC)


def choose_transport(sender_transports: Sequence[str], sender_host: str, receiver_transports: Sequence[str],
                     receiver_host: str) -> str:
    """The fastest transport both workers offer; shared memory only between workers on one host."""
    for transport in TRANSPORTS:
        if transport in sender_transports and transport in receiver_transports:
            if transport == SHM and not (sender_host and sender_host == receiver_host):
                continue
            return transport
    return GRPC


class WorkerTransports:
    """What one worker offers: its transports, its host identity (for shm), its Mooncake engine."""

    def __init__(self, transports: Sequence[str] = (GRPC,), host: str = "", mooncake=None):
        self.transports = tuple(transports)
        self.host_id = host
        self.mooncake = mooncake

    @classmethod
    def start(cls, names: str, advertise_host: str, mooncake_protocol: str = "tcp") -> "WorkerTransports":
        """The configured transports that work here; one that cannot start is left out with a warning."""
        from splitwise.kv.mooncake import MooncakeEngine, MooncakeUnavailable
        from splitwise.kv.staging import SHM_DIR, host_id

        transports = list(parse_transports(names))
        mooncake = None
        if MOONCAKE in transports:
            try:
                mooncake = MooncakeEngine(advertise_host, mooncake_protocol)
                log.warning("KV transport mooncake: its transfer engine listens on every interface and authenticates "
                            "no peer, whatever --listen says (README: Security); offer it only on a trusted network")
            except MooncakeUnavailable as e:
                log.warning("KV transport mooncake left out: %s", e)
                transports.remove(MOONCAKE)
        host = host_id()
        if SHM in transports and not (host and SHM_DIR.is_dir()):
            log.warning("KV transport shm left out: no /dev/shm here")
            transports.remove(SHM)
        return cls(transports, host, mooncake)

    def staging(self, transport: str, size: int):
        """The receiver's staging buffer for a transfer by `transport`, or None (then gRPC carries the bytes)."""
        from splitwise.kv.mooncake import MooncakeStaging
        from splitwise.kv.staging import ShmStaging

        try:
            if transport == SHM and SHM in self.transports:
                return ShmStaging(size)
            if transport == MOONCAKE and self.mooncake is not None:
                return MooncakeStaging(self.mooncake, size)
        except (OSError, RuntimeError) as e:
            log.warning("cannot stage %d bytes for %s (%s): the transfer goes over gRPC", size, transport, e)
        return None

    def offer(self, staging) -> TransportOffer:
        if staging is None:
            return TransportOffer()
        if staging.transport == SHM:
            return TransportOffer(SHM, host_id=self.host_id, shm_name=staging.name, buffer_bytes=staging.tensor.numel())
        return TransportOffer(MOONCAKE, mooncake_session=staging.session, buffer_address=staging.address,
                              buffer_bytes=staging.tensor.numel())

    def writer(self, offer: TransportOffer, size: int):
        """The sender's side of the receiver's offer, or None when it cannot be used from here (then gRPC)."""
        from splitwise.kv.mooncake import MooncakeWriter
        from splitwise.kv.staging import ShmWriter

        if offer.buffer_bytes != size:
            return None
        try:
            if offer.transport == SHM and SHM in self.transports and offer.host_id == self.host_id:
                return ShmWriter(offer.shm_name, size)
            if offer.transport == MOONCAKE and self.mooncake is not None:
                return MooncakeWriter(self.mooncake, offer.mooncake_session, offer.buffer_address, size)
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("cannot use the receiver's %s offer (%s): sending over gRPC", offer.transport, e)
        return None
