"""The Mooncake Transfer Engine transport: one-sided writes into the receiver's registered staging buffer.

Over RDMA on clusters that have it, over TCP elsewhere (here). Each worker process runs one engine in
P2P-handshake mode, so no metadata server is needed: a peer is addressed by its engine's host:rpc_port.
"""

from __future__ import annotations

import logging

import torch

from splitwise.kv.transport.base import TransportOffer

log = logging.getLogger(__name__)


class MooncakeUnavailable(RuntimeError):
    pass


def _transfer_engine_class():
    try:
        from mooncake.engine import TransferEngine
    except (ImportError, OSError) as e:  # not installed, or libibverbs missing
        raise MooncakeUnavailable(f"mooncake-transfer-engine cannot be loaded: {e}") from e
    return TransferEngine


class RegisteredBuffer:
    """Host memory the engine may read from or remote peers may write into, until closed."""

    def __init__(self, engine: "MooncakeEngine", size: int):
        self.engine = engine
        self.tensor = torch.zeros(size, dtype=torch.uint8)  # touched now, not on the transfer's first write
        self.address = self.tensor.data_ptr()
        self.size = size
        if engine.engine.register_memory(self.address, size) != 0:
            raise MooncakeUnavailable(f"cannot register {size} bytes with the transfer engine")
        self._open = True

    def close(self) -> None:
        """After this, writes aimed at the buffer are refused by the engine (they can land nowhere else)."""
        if self._open:
            self._open = False
            self.engine.engine.unregister_memory(self.address)


class MooncakeEngine:
    def __init__(self, host: str, protocol: str = "tcp", device: str = ""):
        self.engine = _transfer_engine_class()()
        if self.engine.initialize(host, "P2PHANDSHAKE", protocol, device) != 0:
            raise MooncakeUnavailable(f"the transfer engine did not start on {host} over {protocol}")
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self.protocol = protocol
        log.info("Mooncake transfer engine at %s (%s)", self.session, protocol)

    def buffer(self, size: int) -> RegisteredBuffer:
        return RegisteredBuffer(self, size)

    def write(self, session: str, buffer: RegisteredBuffer, remote_address: int,
              ranges: list[tuple[int, int]]) -> None:
        """Blocking: copies each (offset, length) of `buffer` to the same offset at the peer's remote_address."""
        local = [buffer.address + offset for offset, _ in ranges]
        remote = [remote_address + offset for offset, _ in ranges]
        lengths = [length for _, length in ranges]
        rc = self.engine.batch_transfer_sync_write(session, local, remote, lengths)
        if rc != 0:
            raise ConnectionError(f"Mooncake write to {session} failed (code {rc})")


class MooncakeStaging:
    """Receiver side: a request's staging buffer, registered for remote writes until closed."""

    transport = "mooncake"

    def __init__(self, engine: MooncakeEngine, size: int):
        self.registered = engine.buffer(size)
        self.tensor = self.registered.tensor
        self.session = engine.session

    def offer(self) -> TransportOffer:
        return TransportOffer("mooncake", mooncake_session=self.session, buffer_address=self.registered.address,
                              buffer_bytes=self.registered.size)

    def close(self, clean: bool = False) -> None:
        self.registered.close()
        self.tensor = None


class MooncakeWriter:
    """Sender side: layers are staged in a local registered mirror, then written to the receiver's buffer."""

    transport = "mooncake"
    remote = True

    def __init__(self, engine: MooncakeEngine, session: str, remote_address: int, size: int):
        self.engine = engine
        self.session = session
        self.remote_address = remote_address
        self.local = engine.buffer(size)
        self.buffer = self.local.tensor

    def flush(self, ranges: list[tuple[int, int]]) -> None:
        self.engine.write(self.session, self.local, self.remote_address, ranges)

    def close(self) -> None:
        self.local.close()
        self.buffer = None


class MooncakeBackend:
    name = "mooncake"
    rank = 2
    needs_same_host = False

    def __init__(self, advertise_host: str, protocol: str = "tcp"):
        self.engine = MooncakeEngine(advertise_host, protocol)
        log.warning("KV transport mooncake: its transfer engine listens on every interface and authenticates no peer, "
                    "whatever --listen says (README: Security); offer it only on a trusted network")

    @classmethod
    def start(cls, host: str, advertise_host: str, mooncake_protocol: str) -> "MooncakeBackend":
        return cls(advertise_host, mooncake_protocol)

    def staging(self, size: int) -> MooncakeStaging:
        return MooncakeStaging(self.engine, size)

    def writer(self, offer: TransportOffer, size: int) -> MooncakeWriter:
        if offer.buffer_bytes < size:
            raise ValueError(f"the receiver's buffer holds {offer.buffer_bytes} bytes, the KV {size}")
        return MooncakeWriter(self.engine, offer.mooncake_session, offer.buffer_address, size)

    def close(self) -> None:
        pass
