"""One shared grpc.aio channel per peer address (and, for the scheduler, one WorkerCalls stream on it), server
streams traced without an interceptor, and the end of a stream we stop reading."""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from splitwise.rpc.calls import CallsSession, MuxedCall
from splitwise.security.tls import ClusterTLS, secure_channel
from splitwise.rpc.options import DEFAULT_KEEPALIVE_S, channel_options
from splitwise.telemetry.tracing import client_interceptors, tracer


class ChannelPool:
    """Channels to cluster peers: mTLS with this service's cluster identity (plaintext only when tls is None,
    the --insecure mode). With traced=False the channels carry no tracing interceptor: every call on them is
    started with TracedStream, which traces it as the interceptor would."""

    def __init__(self, keepalive_s: float = DEFAULT_KEEPALIVE_S, tls: ClusterTLS | None = None, traced: bool = True):
        self.options = channel_options(keepalive_s)
        self.tls = tls
        self.traced = traced
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._sessions: dict[str, CallsSession] = {}

    def calls(self, address: str) -> CallsSession:
        """The WorkerCalls stream to the worker at `address`: a new one once the last has ended."""
        session = self._sessions.get(address)
        if session is None or session.broken:
            session = self._sessions[address] = CallsSession(self.get(address))
        return session

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = secure_channel(
                address, self.tls, options=self.options, interceptors=client_interceptors() if self.traced else None)
        return channel

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


class TracedStream:
    """A server-streaming call with the CLIENT span the gRPC tracing interceptor would give it (its name, kind,
    attributes and status; the trace context in the call's metadata, so the server's span is its child), but
    without the interceptor's per-message layers (an interceptor task, a wrapping generator): the scheduler reads
    two streams of a token each per output token. The span ends in end_stream, which every caller reaches."""

    def __init__(self, method: grpc.aio.UnaryStreamMultiCallable | Callable[..., MuxedCall], name: str, request,
                 timeout: float):
        service, _, rpc = name.lstrip("/").partition("/")
        self.span = tracer().start_span(name, kind=SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.grpc.status_code": grpc.StatusCode.OK.value[0], "rpc.method": rpc,
            "rpc.service": service})
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        self.call = method(request, timeout=timeout, metadata=tuple(carrier.items()))
        self.cancelled_here = False

    def read(self):
        return self.call.read()

    def code(self):
        return self.call.code()

    def details(self):
        return self.call.details()

    def trailing_metadata(self):
        return self.call.trailing_metadata()

    def done(self) -> bool:
        return self.call.done()

    def cancel(self) -> bool:
        self.cancelled_here = True
        return self.call.cancel()

    async def end_span(self) -> None:
        """Ends the span with the call's status (once): an error unless it ended OK or was cancelled here."""
        if not self.span.is_recording():
            return
        try:
            if self.call.done():
                code = await self.call.code()
                if code != grpc.StatusCode.OK and not (code == grpc.StatusCode.CANCELLED and self.cancelled_here):
                    details = await self.call.details()
                    self.span.set_attribute("rpc.grpc.status_code", code.value[0])
                    self.span.set_status(Status(StatusCode.ERROR, f"AioRpcError: {code.name}: {details}"))
        finally:
            self.span.end()


async def end_stream(call: grpc.aio.UnaryStreamCall | MuxedCall | TracedStream, cancel: bool = True) -> None:
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
    finally:
        if isinstance(call, TracedStream):
            await call.end_span()
