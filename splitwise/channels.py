"""One shared grpc.aio channel per peer address, and the end of a stream we stop reading."""

from __future__ import annotations

import asyncio

import grpc

from splitwise.security.tls import ClusterTLS, secure_channel
from splitwise.server import DEFAULT_KEEPALIVE_S, channel_options
from splitwise.telemetry.tracing import client_interceptors


class ChannelPool:
    """Channels to cluster peers: mTLS with this service's cluster identity (plaintext only when tls is None,
    the --insecure mode)."""

    def __init__(self, keepalive_s: float = DEFAULT_KEEPALIVE_S, tls: ClusterTLS | None = None):
        self.options = channel_options(keepalive_s)
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = secure_channel(
                address, self.tls, options=self.options, interceptors=client_interceptors())
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


async def end_stream(call: grpc.aio.UnaryStreamCall, cancel: bool = True) -> None:
    """Ends a server stream we read no further: cancels it if it still runs (unless the server is known to be
    closing it), then reads its end.

    Reading the end is what closes the tracing interceptor's CLIENT span now, with the right end time,
    instead of whenever the garbage collector finalises the abandoned stream.
    """
    if cancel and not call.done():
        call.cancel()
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # this task is being cancelled, not just the call
            raise
    except grpc.aio.AioRpcError:
        pass
