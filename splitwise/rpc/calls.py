"""Many calls on one stream: the scheduler's Prefill and Decode calls to a worker as frames of one long-lived
WorkerCalls.Calls stream (protos/splitwise/v1/worker.proto), each call behaving as the RPC of its method would.

Starting and cancelling a gRPC call costs the scheduler more CPU than its messages do (about 0.5 ms each, against
about 0.1 ms a message), and a request is two worker calls. On one stream a call's start and cancellation are frames,
and the frames written in one turn of the event loop (a decode step's tokens for all of its requests) travel as one
message.

The client end (CallsSession, one per worker address) hands out MuxedCall objects with the subset of
grpc.aio.UnaryStreamCall the scheduler uses: read (EOF at a clean end, grpc.aio.AioRpcError with the call's status
and trailer at a failed one, CancelledError once cancelled here), code, details, trailing_metadata, done and cancel.
The server end (serve_calls) runs each call's servicer method with a CallContext, the subset of
grpc.aio.ServicerContext the servicers use, under a SERVER span named after the method, as the tracing interceptor
would give the RPC.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import grpc
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from splitwise.rpc.errors import STATUS_DETAILS_KEY
from splitwise.rpc.v1 import worker_pb2, worker_pb2_grpc
from splitwise.telemetry.tracing import tracer

log = logging.getLogger(__name__)

# What a worker's registry entry says it serves (WorkerInfo.worker_calls): the scheduler uses the stream only with
# workers that say so, and an RPC per call with older ones.
WORKER_CALLS_VERSION = 1
# A stream's open calls, at most: a start past it ends at once with RESOURCE_EXHAUSTED (a worker holds far fewer
# requests than this; the bound is on what one peer can make it track).
MAX_CALLS_PER_STREAM = 4096
# Frames a worker has queued for a caller that reads too slowly: past it, its calls wait (backpressure, as one
# RPC's flow control would apply).
MAX_QUEUED_FRAMES = 8192
# Frames written at once go in one message up to this many bytes (a frame larger than it goes alone; the channel's
# message limit bounds that).
BATCH_BYTES = 1 << 20
_CODES = {code.value[0]: code for code in grpc.StatusCode}
METHODS = {  # a start's request field -> the RPC it stands for, and its events' field
    "prefill": ("/splitwise.v1.PromptWorker/Prefill", "prefill"),
    "decode": ("/splitwise.v1.TokenWorker/Decode", "decode"),
}


def _trailer(status_details: bytes) -> grpc.aio.Metadata:
    return grpc.aio.Metadata((STATUS_DETAILS_KEY, status_details)) if status_details else grpc.aio.Metadata()


def _batch(frames: list) -> list:
    """The first frames of `frames` that go in one message (at least one)."""
    size = 0
    for i, frame in enumerate(frames):
        size += frame.ByteSize()
        if size > BATCH_BYTES and i > 0:
            return frames[:i]
    return frames


# ---------------------------------------------------------------------------------------------------- client end


class MuxedCall:
    """One call on a CallsSession, read as a server-streaming RPC's call object is."""

    def __init__(self, session: "CallsSession", call_id: int, timeout: float | None):
        self._session = session
        self.call_id = call_id
        self._events: collections.deque = collections.deque()
        self._arrived = asyncio.Event()
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailer = grpc.aio.Metadata()
        self._ended = asyncio.Event()
        self._cancelled_here = False
        self._timer = None
        if timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, timeout), self._expire)

    # what the worker sent (CallsSession's reader)
    def _push(self, event) -> None:
        self._events.append(event)
        self._arrived.set()

    def _end(self, code: grpc.StatusCode, details: str, trailer: grpc.aio.Metadata | None = None) -> None:
        """The call's status. A failure is the call's end at once (its unread events are lost, as an RPC's); a
        call that ended OK is over once its events are read, as an RPC's status follows its messages."""
        if self._code is not None:
            return
        self._code, self._details = code, details
        if trailer is not None:
            self._trailer = trailer
        if self._timer is not None:
            self._timer.cancel()
        self._session._forget(self.call_id)
        self._arrived.set()
        if code != grpc.StatusCode.OK or not self._events:
            self._ended.set()

    def _expire(self) -> None:
        if self._code is None:
            self._session._send_cancel(self.call_id)
            self._end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    # grpc.aio.UnaryStreamCall's interface
    async def read(self):
        while not self._events:
            if self._code is not None:
                if self._cancelled_here:
                    raise asyncio.CancelledError()
                if self._code == grpc.StatusCode.OK:
                    self._ended.set()
                    return grpc.aio.EOF
                raise grpc.aio.AioRpcError(self._code, grpc.aio.Metadata(), self._trailer, self._details)
            self._arrived.clear()
            await self._arrived.wait()
        event = self._events.popleft()
        if not self._events and self._code == grpc.StatusCode.OK:
            self._ended.set()
        return event

    def done(self) -> bool:
        return self._ended.is_set()

    def cancel(self) -> bool:
        if self._ended.is_set():
            return False
        self._cancelled_here = True
        self._events.clear()
        if self._code is None:
            self._session._send_cancel(self.call_id)
            self._end(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        else:  # the worker had ended it OK: its unread events are dropped
            self._code, self._details = grpc.StatusCode.CANCELLED, "Locally cancelled by application!"
            self._arrived.set()
            self._ended.set()
        return True

    async def code(self) -> grpc.StatusCode:
        await self._ended.wait()
        return self._code

    async def details(self) -> str:
        await self._ended.wait()
        return self._details

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await self._ended.wait()
        return self._trailer


class CallsSession:
    """The scheduler's one WorkerCalls stream to a worker. A call's start and cancel frames written in one turn of
    the event loop go in one message; when the stream ends, every call still open on it ends with its status
    (UNAVAILABLE where the worker went away), and the session is `broken`: the pool opens a new one."""

    def __init__(self, channel: grpc.aio.Channel):
        self._stream = worker_pb2_grpc.WorkerCallsStub(channel).Calls()
        self._calls: dict[int, MuxedCall] = {}
        self._ids = itertools.count(1)
        self._outbox: list[worker_pb2.CallIn] = []
        self._wake = asyncio.Event()
        self.broken = False
        self._writer = asyncio.create_task(self._write_forever())
        self._reader = asyncio.create_task(self._read_forever())

    def start(self, kind: str, request, timeout: float | None = None, metadata=()) -> MuxedCall:
        """A call of METHODS[kind] (its request message), started now."""
        call = MuxedCall(self, next(self._ids), timeout)
        if self.broken:
            call._end(grpc.StatusCode.UNAVAILABLE, "the worker's call stream has ended")
            return call
        self._calls[call.call_id] = call
        start = worker_pb2.CallStart(timeout_s=timeout or 0.0, metadata=dict(metadata))
        getattr(start, kind).CopyFrom(request)
        self._send(worker_pb2.CallIn(call=call.call_id, start=start))
        return call

    def _send_cancel(self, call_id: int) -> None:
        if not self.broken:
            self._send(worker_pb2.CallIn(call=call_id, cancel=worker_pb2.CallCancel()))

    def _send(self, frame: worker_pb2.CallIn) -> None:
        self._outbox.append(frame)
        self._wake.set()

    def _forget(self, call_id: int) -> None:
        self._calls.pop(call_id, None)

    async def _write_forever(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox:
                    frames = _batch(self._outbox)
                    self._outbox = self._outbox[len(frames):]
                    await self._stream.write(worker_pb2.CallsIn(frames=frames))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream ended: its reader says how, to every open call
            log.debug("worker call stream: write failed: %s", e)

    async def _read_forever(self) -> None:
        code, details, trailer = grpc.StatusCode.UNAVAILABLE, "the worker ended its call stream", None
        try:
            while True:
                message = await self._stream.read()
                if message is grpc.aio.EOF:
                    break
                for frame in message.frames:
                    call = self._calls.get(frame.call)
                    if call is None:  # cancelled here, or expired: its late frames are dropped
                        continue
                    kind = frame.WhichOneof("kind")
                    if kind == "end":
                        call._end(_CODES.get(frame.end.code, grpc.StatusCode.UNKNOWN), frame.end.message,
                                  _trailer(frame.end.status_details))
                    elif kind is not None:
                        call._push(getattr(frame, kind))
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details()
            if code == grpc.StatusCode.CANCELLED:  # the channel closed under it
                code = grpc.StatusCode.UNAVAILABLE
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.UNAVAILABLE, "the scheduler closed its call stream"
            raise
        finally:
            self.broken = True
            self._writer.cancel()
            for call in list(self._calls.values()):
                call._end(code, details, trailer)

    async def close(self) -> None:
        self.broken = True
        self._stream.cancel()
        for task in (self._writer, self._reader):
            task.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)


# ---------------------------------------------------------------------------------------------------- server end


class CallAborted(Exception):
    """Raised by CallContext.abort, as grpc's ServicerContext.abort raises: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class CallContext:
    """What a servicer method sees of its call when the call is a frame of a WorkerCalls stream: the stream's peer
    (its authentication), the call's own deadline, status, trailer and done callbacks."""

    def __init__(self, stream_context: grpc.aio.ServicerContext, deadline: float | None, metadata=()):
        self._stream_context = stream_context
        self._metadata = tuple(metadata)
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailer: tuple = ()
        self._callbacks: list[Callable] = []
        self._done = False

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        if trailing_metadata:
            self._trailer = tuple(trailing_metadata)
        raise CallAborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, trailing_metadata) -> None:
        self._trailer = tuple(trailing_metadata)

    def add_done_callback(self, callback: Callable) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def auth_context(self):
        return self._stream_context.auth_context()

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def peer(self) -> str:
        return self._stream_context.peer()

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def cancelled(self) -> bool:
        return self._done and self._code == grpc.StatusCode.CANCELLED

    def done(self) -> bool:
        return self._done

    def status_details(self) -> bytes:
        for key, value in self._trailer:
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                return value
        return b""

    def _finish(self) -> None:
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("a call's done callback failed")


@dataclass
class _Stream:
    """One WorkerCalls stream's state on the worker: its open calls' tasks and its outbox."""
    context: grpc.aio.ServicerContext
    outbox: asyncio.Queue
    tasks: dict


Handler = Callable[[object, CallContext], AsyncIterator]


async def serve_calls(requests: AsyncIterator[worker_pb2.CallsIn], context: grpc.aio.ServicerContext,
                      handlers: dict[str, Handler]) -> AsyncIterator[worker_pb2.CallsOut]:
    """The worker's end of a WorkerCalls stream: runs each started call's handler (handlers[kind] for the start's
    request field) as a task of its own, and yields the frames they produce, those ready at once in one message.
    When the stream ends, however it ends, every call still open on it is cancelled (as an RPC whose client went
    away: the handlers free what they hold)."""
    stream = _Stream(context, asyncio.Queue(MAX_QUEUED_FRAMES), {})
    reader = asyncio.create_task(_read_calls(requests, stream, handlers))
    get = None
    try:
        while True:
            get = asyncio.ensure_future(stream.outbox.get())
            if reader.done():  # the scheduler closed its end: the calls open go on to their ends
                reader.result()  # (a failed read of the stream fails it)
                if not stream.tasks and stream.outbox.empty():
                    get.cancel()
                    return
                await asyncio.wait({get, *stream.tasks.values()}, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                continue
            frames, size = [get.result()], 0
            while not stream.outbox.empty() and size < BATCH_BYTES:
                frames.append(stream.outbox.get_nowait())
                size += frames[-1].ByteSize()
            yield worker_pb2.CallsOut(frames=frames)
    finally:
        if get is not None:
            get.cancel()
        reader.cancel()
        tasks = list(stream.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(reader, *tasks, return_exceptions=True)


async def _read_calls(requests: AsyncIterator[worker_pb2.CallsIn], stream: _Stream, handlers: dict) -> None:
    async for message in requests:
        for frame in message.frames:
            kind = frame.WhichOneof("kind")
            if kind == "cancel":
                task = stream.tasks.get(frame.call)
                if task is not None:
                    task.cancel()
            elif kind == "start":
                refused = _start(frame.call, frame.start, stream, handlers)
                if refused is not None:  # (waits while the caller reads nothing: it stops reading its frames)
                    await stream.outbox.put(refused)


def _start(call_id: int, start: worker_pb2.CallStart, stream: _Stream, handlers: dict) -> worker_pb2.CallOut | None:
    """Starts the call's handler; or the end frame that refuses the call."""
    def refuse(code: grpc.StatusCode, message: str) -> worker_pb2.CallOut:
        return worker_pb2.CallOut(call=call_id, end=worker_pb2.CallEnd(code=code.value[0], message=message))

    kind = start.WhichOneof("request")
    if kind not in handlers:
        return refuse(grpc.StatusCode.UNIMPLEMENTED, f"this worker serves no {kind or 'empty'} calls")
    if call_id in stream.tasks:
        return refuse(grpc.StatusCode.INVALID_ARGUMENT, f"call {call_id} is open already on this stream")
    if len(stream.tasks) >= MAX_CALLS_PER_STREAM:
        return refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"{MAX_CALLS_PER_STREAM} calls are open on this stream already: end some first")
    task = asyncio.create_task(_run_call(call_id, kind, start, stream, handlers[kind]),
                               name=f"WorkerCall[{METHODS[kind][0]}]")
    stream.tasks[call_id] = task
    task.add_done_callback(lambda _: stream.tasks.pop(call_id, None))
    return None


async def _run_call(call_id: int, kind: str, start: worker_pb2.CallStart, stream: _Stream, handler: Handler) -> None:
    name, field = METHODS[kind]
    service, _, method = name.lstrip("/").partition("/")
    loop = asyncio.get_running_loop()
    timeout = start.timeout_s if start.timeout_s > 0 else None
    metadata = dict(start.metadata)
    context = CallContext(stream.context, None if timeout is None else loop.time() + timeout, metadata.items())
    parent = propagate.extract(metadata)
    code, message = grpc.StatusCode.OK, ""
    with tracer().start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
            "rpc.grpc.status_code": grpc.StatusCode.OK.value[0]}, record_exception=False,
            set_status_on_exception=False) as span:
        try:
            async with asyncio.timeout(timeout):
                async for event in handler(getattr(start, kind), context):
                    await stream.outbox.put(worker_pb2.CallOut(call=call_id, **{field: event}))
            if context._code not in (None, grpc.StatusCode.OK):
                code, message = context._code, context._details
        except CallAborted as e:
            code, message = e.code, e.details
        except TimeoutError:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except asyncio.CancelledError:  # the caller cancelled the call, or the stream ended: no end to send
            context._code = grpc.StatusCode.CANCELLED
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
            span.set_status(Status(StatusCode.ERROR, "cancelled"))
            raise
        except Exception as e:  # as grpc ends an RPC whose handler raised
            log.exception("%s call %s failed", name, call_id)
            span.record_exception(e)
            code, message = grpc.StatusCode.UNKNOWN, f"Unexpected {type(e).__name__}: {e}"
        finally:
            context._finish()
        if code != grpc.StatusCode.OK:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))
        end = worker_pb2.CallEnd(code=code.value[0], message=message, status_details=context.status_details())
        await stream.outbox.put(worker_pb2.CallOut(call=call_id, end=end))
